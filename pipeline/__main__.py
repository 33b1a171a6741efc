from pipeline.cli import leave, main

leave(main())
