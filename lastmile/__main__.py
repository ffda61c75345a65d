from lastmile.cli import main

raise SystemExit(main())
