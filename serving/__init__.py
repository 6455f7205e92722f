"""What runs inside serving processes. Knows nothing of Prefect or of the rest of nodewise.

``serving.app`` (Ray Serve) imports Ray; import it only where Ray is wanted.
"""

from serving.spec import ModelServeSpec

__all__ = ["ModelServeSpec"]
