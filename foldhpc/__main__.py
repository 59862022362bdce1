from foldhpc.cli import main

raise SystemExit(main())
