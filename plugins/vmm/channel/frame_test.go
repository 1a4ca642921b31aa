package channel

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func TestReader(t *testing.T) {
	f1 := appendFrame(nil, typeData, 9, []byte("one"))
	f2 := appendFrame(nil, typeReset, 10, nil)
	big := appendFrame(nil, typeData, 11, bytes.Repeat([]byte{1}, MaxPayload))
	badPayload := append([]byte(nil), f1...)
	badPayload[len(badPayload)-1] ^= 0xff
	badHeader := append([]byte(nil), f1...)
	badHeader[9] ^= 0x01 // the length, covered by the header CRC
	tooLong := appendFrame(nil, typeData, 1, bytes.Repeat([]byte{2}, MaxPayload+1))
	unknownType := appendFrame(nil, 99, 1, nil)
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	tests := []struct {
		name     string
		in       []byte
		sessions []uint32
	}{
		{"frames back to back", cat(f1, f2), []uint32{9, 10}},
		{"garbage between", cat([]byte("xx\xb5"), f1, []byte{magic0, magic1, 0}, f2), []uint32{9, 10}},
		{"corrupt payload skipped", cat(badPayload, f2), []uint32{10}},
		{"corrupt header skipped", cat(badHeader, f2), []uint32{10}},
		{"too long skipped", cat(tooLong, f2), []uint32{10}},
		{"unknown type skipped", cat(unknownType, f2), []uint32{10}},
		{"frame inside a cut frame", cat(big[:100], f1, make([]byte, syncLen), f2), []uint32{9, 10}},
		{"cut header then sync", cat(big[:headerLen+5], make([]byte, syncLen), f2), []uint32{10}},
		{"max payload", cat(big, f1), []uint32{11, 9}},
		{"magic split at a read", cat([]byte("z"), f2), []uint32{10}},
	}
	for _, tc := range tests {
		for _, chunk := range []int{1, 7, 4096, 1 << 20} {
			r := newReader(&chunkReader{b: tc.in, n: chunk})
			var got []uint32
			for {
				f, err := r.next()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatalf("%s/%d: %v", tc.name, chunk, err)
				}
				got = append(got, f.session)
			}
			if len(got) != len(tc.sessions) {
				t.Errorf("%s, reads of %d: sessions %v, want %v", tc.name, chunk, got, tc.sessions)
				continue
			}
			for i := range got {
				if got[i] != tc.sessions[i] {
					t.Errorf("%s, reads of %d: sessions %v, want %v", tc.name, chunk, got, tc.sessions)
				}
			}
		}
	}
}

// chunkReader returns at most n bytes a read.
type chunkReader struct {
	b []byte
	n int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), c.n)], c.b)
	c.b = c.b[n:]
	return n, nil
}

// FuzzReader: whatever comes first, a frame sent after the sync filler is
// found, and nothing panics.
func FuzzReader(f *testing.F) {
	f.Add([]byte{})
	f.Add(appendFrame(nil, typeData, 1, []byte("xyzzy"))[:23])
	f.Add(appendFrame(nil, typeData, 1, make([]byte, MaxPayload))[:headerLen])
	f.Add([]byte{magic0, magic1, version, typeData, 0, 0, 0, 1, 0, 0, 0x40, 0})
	marker := appendFrame(nil, typeReset, 0xfeedbeef, nil)
	f.Fuzz(func(t *testing.T, noise []byte) {
		in := bytes.Join([][]byte{noise, make([]byte, syncLen), marker}, nil)
		r := newReader(&chunkReader{b: in, n: 997})
		var last frame
		for {
			fr, err := r.next()
			if err != nil {
				break
			}
			if len(fr.payload) > MaxPayload {
				t.Fatalf("payload of %d bytes", len(fr.payload))
			}
			last = fr
		}
		if last.session != 0xfeedbeef || last.typ != typeReset {
			t.Fatalf("marker frame not found last (got %d/%x)", last.typ, last.session)
		}
	})
}
