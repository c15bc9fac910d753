from mergesmith.cli.main import main

main()
