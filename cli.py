from mlxrl.cli import main

main()
