"""Teacher -> student initialisation: every student mixer is built from a Llama attention layer.

MLA (SVD init)       : see the MLA section below.
Mamba2 (attention reinterpretation): see the Mamba2 section below.
"""

# ---------------------------------------------------------------------------------------
# MLA: SVD init


# ---------------------------------------------------------------------------------------
# Mamba2: attention -> SSD reinterpretation
