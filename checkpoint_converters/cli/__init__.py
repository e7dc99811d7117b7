"""The converters' command lines (parse_args + main); tools/*.py and the megadiff-* console scripts call them."""
