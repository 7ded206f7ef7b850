// Integration tests live here.
