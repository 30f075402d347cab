from bnwd_cli.cli.app import main

main()
