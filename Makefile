# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DK := $(VENV)/bin/diffusekit
STAMP := $(VENV)/.installed
# A CPU build of torch lies on these machines' disk; a bare `torch` would pull CUDA.
TORCH_SPEC ?= torch==2.13.0
DEMO_BUDGET ?= 3m
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
CHROMIUM := /usr/bin/chromium
SYMBOL_FONT := /usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf

.PHONY: demo demo-text demo-mnist test emoji-font symbol-font browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "open-clip-torch>=2.20"  # only its CLIP vocabulary file is read (io/clip_vocab.py); its deps would pull torchvision
	@$(MAKE) --no-print-directory emoji-font symbol-font
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The emoji dataset renders the Noto Color Emoji font (Debian package fonts-noto-color-emoji).
# Best effort: without it the emoji tests are skipped and the dataset says how to install it.
emoji-font:
	@test -f $(EMOJI_FONT) || (command -v apt-get >/dev/null && apt-get install -y -q fonts-noto-color-emoji >/dev/null 2>&1) \
		|| echo "note: fonts-noto-color-emoji is not installed (apt-get install fonts-noto-color-emoji); the emoji dataset needs it"

# The browser test of `diffusekit serve` drives Debian's chromium with Playwright for Python (the pip package; its
# own browser download cannot work offline). Best effort: without chromium that test is skipped and says why.
browser:
	@test -x $(CHROMIUM) || (command -v apt-get >/dev/null && (apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1))) \
		|| echo "note: chromium is not installed (apt-get install chromium); the browser test of diffusekit serve is skipped"

# benchmarks/finetune.py teaches the emoji model symbols of the Symbola font (Debian package fonts-symbola). Best effort.
symbol-font:
	@test -f $(SYMBOL_FONT) || (command -v apt-get >/dev/null && apt-get install -y -q fonts-symbola >/dev/null 2>&1) \
		|| echo "note: fonts-symbola is not installed (apt-get install fonts-symbola); benchmarks/finetune.py needs it"

# Text to image with the shipped emoji model (seconds), then MNIST trained from scratch for DEMO_BUDGET.
demo: demo-text demo-mnist

demo-text: $(STAMP)
	$(DK) generate "red apple" "grinning face" "rocket" "sun" "snowman" "pizza" "red heart" "dog face" \
		--n 8 --steps 20 --seed 0 --out runs/demo/emoji.png --overwrite
	@echo "Text-to-image samples: runs/demo/emoji.png"

demo-mnist: $(STAMP)
	$(DK) train --preset mnist --out runs/demo/mnist --budget $(DEMO_BUDGET) --overwrite
	$(DK) sample runs/demo/mnist --n 64 --steps 20 --sampler dpmpp_2m_sde --seed 0 --out runs/demo/mnist_grid.png --overwrite
	@echo "MNIST sample grid after $(DEMO_BUDGET) of training: runs/demo/mnist_grid.png"

test: $(STAMP) browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
