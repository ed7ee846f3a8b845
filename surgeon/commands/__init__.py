"""One module per ``surgeon`` sub-command; each only parses options and calls the library."""
