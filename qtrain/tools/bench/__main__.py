from qtrain.tools.bench.main import main

main()
