"""Training / validation data for the demo model: photo gathering, LR degradation, crop sampling."""
