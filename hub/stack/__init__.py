"""Operations, the top layer: the ``gpuportal`` CLI, ``up``/``down`` of the embedded
stack, the local Ray head, the house provider and admin creation."""
