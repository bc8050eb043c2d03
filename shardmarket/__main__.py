from shardmarket.cli import main

raise SystemExit(main())
