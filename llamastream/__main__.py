from llamastream.cli import main

main()
