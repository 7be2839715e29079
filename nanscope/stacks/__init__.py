"""Model families behind one seam."""
