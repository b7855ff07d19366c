from hpopt.cli import main

main()
