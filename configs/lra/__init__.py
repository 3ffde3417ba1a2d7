"""Long Range Arena task configs."""
