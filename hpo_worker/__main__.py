from hpo_worker.cli import main

raise SystemExit(main())
