"""The users= file of batch candidates: bytes that are not UTF-8 fail with one line naming the file and line."""
import numpy as np
import pytest

from data.types import Vocab
from serve.candidates import CandidatesError, read_users


def test_a_users_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "users.txt"
    path.write_bytes(b"3\n\n1\n\xff\xfe7\n2\n")
    with pytest.raises(CandidatesError) as info:
        read_users(path, Vocab(np.array([1, 2, 3])), skip_unknown=False)
    msg = str(info.value)
    assert msg.startswith(f"users={path} line 4: cannot decode as UTF-8") and "\n" not in msg
    # The same ids in UTF-8 are read (blank lines ignored, rows sorted and distinct).
    path.write_bytes(b"3\n\n1\n3\n2\n")
    assert read_users(path, Vocab(np.array([1, 2, 3])), skip_unknown=False).tolist() == [0, 1, 2]
