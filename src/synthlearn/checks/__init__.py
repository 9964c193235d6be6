"""The papers' own checks, each one command (``synthlearn paper-check NAME``): small experiments that reproduce a
figure or table of a paper on phantom data, with their figures and pictures."""
