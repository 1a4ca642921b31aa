package unixsock

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestListen(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s", "x.sock")
	l, err := Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen("unix", sock); err == nil {
		t.Fatal("a second server took the same socket")
	}
	go func() {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
	}()
	c, err := l.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckPeer(c); err != nil {
		t.Fatalf("own user refused: %v", err)
	}
	c.Close()
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", st, err)
	}
	l.Close()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after close: %v", err)
	}
	// Released: another server may take it now.
	l2, err := Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l2.Close()
}
