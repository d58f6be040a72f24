"""FLOP-matched studies: a sweep file -> planned runs -> launched runs -> fitted scaling laws."""
