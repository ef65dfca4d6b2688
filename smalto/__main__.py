from smalto.cli import main

main()
