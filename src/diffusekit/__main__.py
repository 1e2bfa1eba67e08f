from diffusekit.cli import main

raise SystemExit(main())
