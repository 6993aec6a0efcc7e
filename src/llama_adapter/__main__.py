from llama_adapter.cli import main

raise SystemExit(main())
