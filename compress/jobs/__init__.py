"""The jobs behind ``compress train-prune`` (`train`) and ``compress prune`` (`prune`), and
what they share (`runner`)."""
