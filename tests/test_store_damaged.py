"A lab.db whose schema pages are intact but whose data pages are damaged opens; queries then raise our StoreError."
import pytest
import sqlalchemy as sa
from openpipe_lab.core import StoreError
from openpipe_lab.logstore import LogStore


def test_damaged_data_pages_are_a_store_error(tmp_path):
    path = tmp_path / 'lab.db'
    s = LogStore(str(path))
    for i in range(300):
        s.record(model='m', req_payload={'model': 'm', 'messages': [{'role': 'user', 'content': 'y' * 500}]}, tags={'i': str(i)})
    s.flush(); s.close(); s.db.dispose()
    with sa.create_engine(f'sqlite:///{path}').connect() as c: c.exec_driver_sql('PRAGMA wal_checkpoint(TRUNCATE)')
    data = bytearray(path.read_bytes())
    for off in range(len(data) - 20 * 4096, len(data), 4096): data[off:off + 64] = bytes(64)  # pages written last: logs
    (tmp_path / 'bad').mkdir()
    bad = tmp_path / 'bad' / 'lab.db'
    bad.write_bytes(bytes(data))
    store = LogStore(str(bad))  # opens: the schema pages are intact
    with pytest.raises(StoreError, match=r"lab\.db.*damaged.*recover"):
        list(store.filter()); store.filter(i='3').df
    store.close()
