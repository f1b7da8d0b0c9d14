from bpftune.cli import main

raise SystemExit(main())
