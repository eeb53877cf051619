"""A thin typed client for kfeed over the generated kfeed.v1 stubs."""
