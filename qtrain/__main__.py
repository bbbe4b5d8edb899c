from qtrain.cli import main

main()
