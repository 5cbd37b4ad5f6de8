#!/usr/bin/python3
"""Full and incremental backups of an NBD export with only libnbd (python3-libnbd).

    nbd-backup.py full URI FILE
        Copy the export at URI into FILE (created sparse; extents the server
        reports as zero are skipped, as nbdcopy does).

    nbd-backup.py incremental URI BASE FILE
        FILE holds a copy of snapshot BASE. Read only the extents that the
        export at URI reports dirty in the context qemu:dirty-bitmap:BASE and
        write them into FILE at the same offsets: FILE then equals the export.

With dmsnap (see README, "Incremental backup"):

    dmsnap snapshot create POOL s1
    nbd-backup.py full 'nbd+unix:///s1?socket=POOL/nbd.sock' backup.img
    ... the origin keeps changing ...
    dmsnap snapshot create POOL s2
    nbd-backup.py incremental 'nbd+unix:///s2?socket=POOL/nbd.sock' s1 backup.img
    dmsnap snapshot remove POOL s1        # s2 is the base of the next one

Prints one line to stderr: bytes copied, extents, export size.
"""

import os
import sys

import nbd

PIECE = 4 << 20  # bytes per read
QUERY = 1 << 30  # bytes per block-status request
ALLOCATION = "base:allocation"
STATE_ZERO = 2
DIRTY = 1


def connect(uri, context):
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        sys.exit(f"nbd-backup: the server does not offer {context!r} on {uri}")
    return h


def extents(h, context, size):
    """Yield (offset, length, flags) for context over the whole export."""
    offset = 0
    while offset < size:
        got = []

        def cb(meta, off, entries, err):
            if meta == context:
                got.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(min(size - offset, QUERY), offset, cb)
        if not got:
            sys.exit(f"nbd-backup: no extents for {context!r} at offset {offset}")
        for length, flags in got:
            length = min(length, size - offset)
            if length <= 0:
                break
            yield offset, length, flags
            offset += length


def copy(h, fd, offset, length):
    end = offset + length
    while offset < end:
        n = min(PIECE, end - offset)
        os.pwrite(fd, h.pread(n, offset), offset)
        offset += n


def main(argv):
    if len(argv) == 4 and argv[1] == "full":
        uri, path, base = argv[2], argv[3], None
        context = ALLOCATION
    elif len(argv) == 5 and argv[1] == "incremental":
        uri, base, path = argv[2], argv[3], argv[4]
        context = "qemu:dirty-bitmap:" + base
    else:
        sys.exit(__doc__)
    h = connect(uri, context)
    size = h.get_size()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if base is None else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if base is not None and os.fstat(fd).st_size != size:
            sys.exit(f"nbd-backup: {path} is not a copy of a {size}-byte export")
        os.ftruncate(fd, size)
        copied = count = 0
        for off, length, f in extents(h, context, size):
            wanted = (f & DIRTY) if base is not None else not (f & STATE_ZERO)
            if wanted:
                copy(h, fd, off, length)
                copied += length
                count += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    h.shutdown()
    print(f"nbd-backup: copied {copied} bytes in {count} extents of a {size}-byte export",
          file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
