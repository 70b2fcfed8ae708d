from clipaudit.cli import main

main()
