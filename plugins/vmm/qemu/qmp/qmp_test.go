package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"}, "capabilities": ["oob"]}}`

// fakeQEMU serves one QMP client: it answers each command with reply(cmd)
// (a JSON fragment: `"return": {...}` or `"error": {...}`), and sends the
// events events(cmd) after the reply.
type fakeQEMU struct {
	t       *testing.T
	first   string
	reply   func(cmd map[string]any) string
	events  func(cmd map[string]any) []string
	gotFD   chan int
	gotCmds chan map[string]any
}

func (f *fakeQEMU) serve(conn *net.UnixConn) {
	defer conn.Close()
	first := f.first
	if first == "" {
		first = greeting
	}
	conn.Write([]byte(first + "\r\n"))
	r := bufio.NewReader(&fdReader{conn: conn, fds: f.gotFD})
	dec := json.NewDecoder(r)
	for {
		var cmd map[string]any
		if err := dec.Decode(&cmd); err != nil {
			return
		}
		if f.gotCmds != nil {
			f.gotCmds <- cmd
		}
		id, _ := json.Marshal(cmd["id"])
		rep := `"return": {}`
		if f.reply != nil {
			rep = f.reply(cmd)
		}
		if rep == "" { // hang up instead
			return
		}
		conn.Write([]byte(`{` + rep + `, "id": ` + string(id) + "}\r\n"))
		if f.events != nil {
			for _, e := range f.events(cmd) {
				conn.Write([]byte(e + "\r\n"))
			}
		}
	}
}

// fdReader reads a Unix socket, collecting file descriptors sent along.
type fdReader struct {
	conn *net.UnixConn
	fds  chan int
}

func (r *fdReader) Read(p []byte) (int, error) {
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := r.conn.ReadMsgUnix(p, oob)
	if oobn > 0 && r.fds != nil {
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			fds, _ := unix.ParseUnixRights(&m)
			for _, fd := range fds {
				r.fds <- fd
			}
		}
	}
	return n, err
}

func start(t *testing.T, f *fakeQEMU) (*Client, error) {
	t.Helper()
	f.t = t
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.AcceptUnix()
		if err == nil {
			f.serve(c)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, sock, nil)
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestHandshakeAndStatus(t *testing.T) {
	cmds := make(chan map[string]any, 10)
	c, err := start(t, &fakeQEMU{gotCmds: cmds, reply: func(cmd map[string]any) string {
		if cmd["execute"] == "query-status" {
			return `"return": {"status": "paused", "singlestep": false, "running": false}`
		}
		return `"return": {}`
	}})
	if err != nil {
		t.Fatal(err)
	}
	if g := c.Greeting(); g.Version.QEMU.Major != 7 || g.Version.QEMU.Minor != 2 {
		t.Errorf("greeting %+v", g)
	}
	if cmd := <-cmds; cmd["execute"] != "qmp_capabilities" {
		t.Errorf("first command %v", cmd)
	}
	st, err := c.QueryStatus(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.Running || st.Status != "paused" {
		t.Errorf("status %+v", st)
	}
}

func TestCommands(t *testing.T) {
	tests := []struct {
		name string
		run  func(c *Client) error
		want string // the command's JSON, without id
	}{
		{"quit", func(c *Client) error { return c.Quit(ctx(t)) }, `{"execute":"quit"}`},
		{"cont", func(c *Client) error { return c.Cont(ctx(t)) }, `{"execute":"cont"}`},
		{"stop", func(c *Client) error { return c.Stop(ctx(t)) }, `{"execute":"stop"}`},
		{"powerdown", func(c *Client) error { return c.SystemPowerdown(ctx(t)) }, `{"execute":"system_powerdown"}`},
		{"device_add", func(c *Client) error {
			return c.DeviceAdd(ctx(t), "virtio-net-pci", "nic0", map[string]any{"netdev": "net0", "mac": "02:00:00:00:00:01", "bus": "hp0"})
		}, `{"arguments":{"bus":"hp0","driver":"virtio-net-pci","id":"nic0","mac":"02:00:00:00:00:01","netdev":"net0"},"execute":"device_add"}`},
		{"netdev_add", func(c *Client) error { return c.NetdevAdd(ctx(t), "tap", "net0", map[string]any{"fd": "tap0"}) },
			`{"arguments":{"fd":"tap0","id":"net0","type":"tap"},"execute":"netdev_add"}`},
		{"migrate", func(c *Client) error { return c.Migrate(ctx(t), "exec:cat > /x") }, `{"arguments":{"uri":"exec:cat \u003e /x"},"execute":"migrate"}`},
		{"migrate-incoming", func(c *Client) error { return c.MigrateIncoming(ctx(t), "exec:cat /x") }, `{"arguments":{"uri":"exec:cat /x"},"execute":"migrate-incoming"}`},
		{"capabilities", func(c *Client) error {
			return c.MigrateSetCapabilities(ctx(t), Capability{"x-ignore-shared", true})
		}, `{"arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]},"execute":"migrate-set-capabilities"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmds := make(chan map[string]any, 10)
			c, err := start(t, &fakeQEMU{gotCmds: cmds})
			if err != nil {
				t.Fatal(err)
			}
			<-cmds // qmp_capabilities
			if err := tc.run(c); err != nil {
				t.Fatal(err)
			}
			got := <-cmds
			delete(got, "id")
			b, _ := json.Marshal(got)
			if string(b) != tc.want {
				t.Errorf("sent %s\nwant %s", b, tc.want)
			}
		})
	}
}

func TestError(t *testing.T) {
	c, err := start(t, &fakeQEMU{reply: func(cmd map[string]any) string {
		if cmd["execute"] == "device_add" {
			return `"error": {"class": "GenericError", "desc": "Duplicate device ID 'nic0'"}`
		}
		return `"return": {}`
	}})
	if err != nil {
		t.Fatal(err)
	}
	err = c.DeviceAdd(ctx(t), "virtio-net-pci", "nic0", nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "GenericError" || qe.Command != "device_add" || !strings.Contains(err.Error(), "Duplicate") {
		t.Fatalf("err %v", err)
	}
}

func TestEventsAndMigration(t *testing.T) {
	tests := []struct {
		name    string
		events  []string
		wantErr string
	}{
		{"completed", []string{
			`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "setup"}}`,
			`{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "RESUME"}`,
			`{"timestamp": {"seconds": 1, "microseconds": 4}, "event": "MIGRATION", "data": {"status": "completed"}}`,
		}, ""},
		{"failed", []string{
			`{"timestamp": {"seconds": 1, "microseconds": 4}, "event": "MIGRATION", "data": {"status": "failed"}}`,
		}, "failed: disk full"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := start(t, &fakeQEMU{
				reply: func(cmd map[string]any) string {
					if cmd["execute"] == "query-migrate" {
						return `"return": {"status": "failed", "error-desc": "disk full"}`
					}
					return `"return": {}`
				},
				events: func(cmd map[string]any) []string {
					if cmd["execute"] == "migrate-incoming" {
						return tc.events
					}
					return nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			all := c.Subscribe()
			defer all.Close()
			err = c.RunMigration(ctx(t), func(ctx context.Context) error { return c.MigrateIncoming(ctx, "exec:cat /x") })
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("err %v, want %q", err, tc.wantErr)
			}
			e, err := all.Wait(ctx(t), nil)
			if err != nil || e.Name != "MIGRATION" || e.Time.Unix() != 1 {
				t.Errorf("first event %+v, %v", e, err)
			}
		})
	}
}

func TestGetFD(t *testing.T) {
	fds := make(chan int, 1)
	c, err := start(t, &fakeQEMU{gotFD: fds})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := c.GetFD(ctx(t), "tap0", int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	select {
	case fd := <-fds:
		var a, b unix.Stat_t
		unix.Fstat(fd, &a)
		unix.Fstat(int(f.Fd()), &b)
		unix.Close(fd)
		if a.Ino != b.Ino || a.Dev != b.Dev {
			t.Error("received another file")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no file descriptor received")
	}
}

func TestClosed(t *testing.T) {
	c, err := start(t, &fakeQEMU{reply: func(cmd map[string]any) string {
		if cmd["execute"] == "quit" {
			return "" // QEMU exits before it answers
		}
		return `"return": {}`
	}})
	if err != nil {
		t.Fatal(err)
	}
	sub := c.Subscribe("SHUTDOWN")
	if err := c.Quit(ctx(t)); err != nil {
		t.Fatalf("quit: %v", err)
	}
	<-c.Done()
	if _, ok := <-sub.Events(); ok {
		t.Error("subscription open after the connection closed")
	}
	if _, err := c.QueryStatus(ctx(t)); !errors.Is(err, ErrClosed) {
		t.Errorf("command after close: %v", err)
	}
}

func TestBadGreeting(t *testing.T) {
	for _, first := range []string{`{"return": {}}`, `not json`} {
		if _, err := start(t, &fakeQEMU{first: first}); err == nil {
			t.Errorf("greeting %q accepted", first)
		}
	}
}
