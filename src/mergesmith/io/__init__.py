"""Reading model weights lazily, writing shards as a stream, and assembling the output directory."""
