"""What every layer uses: numbers as users write them, files written atomically and read
safely, devices."""
