from analysis.taylor_prune.cli import main

main()
