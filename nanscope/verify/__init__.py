"""`verify-fix`: replay a batch, run a before and an after criterion on the same outputs, and check the fix.

`pipeline` runs the criteria, backward passes and training steps; `checks` turns them into the ten checks;
`peak_memory` measures loss + backward memory the same way for both.
"""

from nanscope.verify.pipeline import verify_fix, verify_replay

__all__ = ["verify_fix", "verify_replay"]
