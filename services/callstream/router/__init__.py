"""Router service: intent classification (SetFit) and rule-based routing of tickets and call transcripts."""
