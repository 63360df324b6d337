"""DeepRecognition: distributed CelebA face-attribute classifiers and face GANs on Ray."""

__version__ = "0.1.0"
