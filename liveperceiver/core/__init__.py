"""The model's world: the vocabulary, the MIDI tokenizer, the live stream encoder/decoder, the Perceiver AR
model and its checkpoints. Depends on nothing else in the package."""
