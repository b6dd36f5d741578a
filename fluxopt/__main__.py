from fluxopt.cli import main

main()
