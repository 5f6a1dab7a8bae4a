"""The operator's console for a federation (`fedadmin`); it never imports numpy or torch."""
