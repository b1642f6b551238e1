"""The exception type for bad input to the data pipeline."""


class DataError(Exception):
    """Bad input (a flag, a file, a row): the message names what is wrong and where.

    ``tools/preprocess_data.py`` prints it as ``preprocess_data.py: error: <message>`` and exits with status 2.
    """
