package channel

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
)

// Frame types.
const (
	typeHello    = 1 // guest -> host, session 0: "I am here, with no session"
	typeReset    = 2 // host -> guest: "start session S, drop everything before"
	typeResetAck = 3 // guest -> host: "session S started"
	typeData     = 4 // either way: a chunk of session S's byte stream
	typeClose    = 5 // either way: "session S is over"
)

const (
	magic0, magic1 = 0xB5, 0x4B // never a zero byte: a run of zeros (the sync filler) holds no frame
	version        = 1
	headerLen      = 20
	// MaxPayload is the largest payload of one frame. A session's stream is
	// cut into frames of at most this size.
	MaxPayload = 16 << 10
	// syncLen zero bytes complete any frame a receiver may be stuck inside
	// (its header said more bytes than ever came): sent before every reset
	// and its acknowledgement.
	syncLen = headerLen + MaxPayload
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// frame is one decoded frame.
type frame struct {
	typ     byte
	session uint32
	payload []byte
}

// Header layout (big endian):
//
//	0  magic    2  0xB5 0x4B
//	2  version  1
//	3  type     1
//	4  session  4
//	8  length   4  payload length, at most MaxPayload
//	12 pcrc     4  CRC-32C of the payload
//	16 hcrc     4  CRC-32C of bytes 0-15
func appendFrame(b []byte, typ byte, session uint32, payload []byte) []byte {
	var h [headerLen]byte
	h[0], h[1], h[2], h[3] = magic0, magic1, version, typ
	binary.BigEndian.PutUint32(h[4:], session)
	binary.BigEndian.PutUint32(h[8:], uint32(len(payload)))
	binary.BigEndian.PutUint32(h[12:], crc32.Checksum(payload, castagnoli))
	binary.BigEndian.PutUint32(h[16:], crc32.Checksum(h[:16], castagnoli))
	b = append(b, h[:]...)
	return append(b, payload...)
}

// parseHeader validates a header and returns its type, session, payload
// length and payload CRC.
func parseHeader(h []byte) (typ byte, session uint32, n int, pcrc uint32, ok bool) {
	if len(h) < headerLen || h[0] != magic0 || h[1] != magic1 || h[2] != version {
		return 0, 0, 0, 0, false
	}
	if crc32.Checksum(h[:16], castagnoli) != binary.BigEndian.Uint32(h[16:]) {
		return 0, 0, 0, 0, false
	}
	typ = h[3]
	if typ < typeHello || typ > typeClose {
		return 0, 0, 0, 0, false
	}
	l := binary.BigEndian.Uint32(h[8:])
	if l > MaxPayload {
		return 0, 0, 0, 0, false
	}
	return typ, binary.BigEndian.Uint32(h[4:]), int(l), binary.BigEndian.Uint32(h[12:]), true
}

// reader finds frames in a byte stream that may hold anything between
// them: the tail of a frame cut by a reconnect, zeros, garbage. A candidate
// frame that fails its checks is skipped one byte at a time, so a real
// frame that started inside it is still found.
type reader struct {
	r   io.Reader
	buf []byte // buf[off:] is unconsumed
	off int
	// skipped counts bytes discarded as not part of any frame.
	skipped int64
}

func newReader(r io.Reader) *reader {
	return &reader{r: r, buf: make([]byte, 0, 2*syncLen)}
}

// next returns the next valid frame. Its payload is only valid until the
// next call. Read errors are returned as they are; the bytes read so far
// stay buffered, so next may be called again after a transient error.
func (p *reader) next() (frame, error) {
	for {
		b := p.buf[p.off:]
		i := indexMagic(b)
		if i < 0 {
			// Keep a last byte that may start a magic.
			keep := 0
			if len(b) > 0 && b[len(b)-1] == magic0 {
				keep = 1
			}
			p.discard(len(b) - keep)
			if err := p.fill(); err != nil {
				return frame{}, err
			}
			continue
		}
		p.discard(i)
		b = p.buf[p.off:]
		if len(b) < headerLen {
			if err := p.fill(); err != nil {
				return frame{}, err
			}
			continue
		}
		typ, session, n, pcrc, ok := parseHeader(b)
		if !ok {
			p.discard(1)
			continue
		}
		if len(b) < headerLen+n {
			if err := p.fill(); err != nil {
				return frame{}, err
			}
			continue
		}
		payload := b[headerLen : headerLen+n]
		if crc32.Checksum(payload, castagnoli) != pcrc {
			p.discard(1)
			continue
		}
		p.off += headerLen + n
		return frame{typ: typ, session: session, payload: payload}, nil
	}
}

// reset drops whatever is buffered (a partial frame of a peer that is
// gone).
func (p *reader) reset() {
	p.skipped += int64(len(p.buf) - p.off)
	p.buf, p.off = p.buf[:0], 0
}

func (p *reader) discard(n int) {
	p.off += n
	p.skipped += int64(n)
}

// fill reads more bytes, compacting the buffer first.
func (p *reader) fill() error {
	if p.off > 0 {
		n := copy(p.buf, p.buf[p.off:])
		p.buf, p.off = p.buf[:n], 0
	}
	if len(p.buf) == cap(p.buf) {
		// Cannot happen: a candidate frame is at most syncLen bytes and
		// the buffer holds two.
		return errors.New("channel: frame buffer full")
	}
	n, err := p.r.Read(p.buf[len(p.buf):cap(p.buf)])
	p.buf = p.buf[:len(p.buf)+n]
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

func indexMagic(b []byte) int {
	for i := 0; i+1 < len(b); i++ {
		if b[i] == magic0 && b[i+1] == magic1 {
			return i
		}
	}
	return -1
}
