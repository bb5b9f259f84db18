from memtune.cli import main

main()
