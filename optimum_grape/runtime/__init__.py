"""How the process runs, beneath every stage: handing freed memory back to the OS (`memory`)."""
