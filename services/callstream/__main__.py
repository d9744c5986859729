from callstream.cli import app

app()
