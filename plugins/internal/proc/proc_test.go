package proc

import (
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseStat(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Stat
		wantErr bool
	}{
		{"plain", "42 (sleep) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 1000 100", Stat{'S', 1, 12345}, false},
		{"parens in name", "7 (a) b (c)) Z 3 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0", Stat{'Z', 3, 99}, false},
		{"truncated", "7 (x) S 1", Stat{}, true},
		{"garbage", "nothing here", Stat{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStat([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestSignalChecksStartTime(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	pid := cmd.Process.Pid
	start := StartTime(pid)
	if start == 0 || !Alive(pid, start) {
		t.Fatalf("process %d not seen alive", pid)
	}
	if Alive(pid, start+1) {
		t.Fatal("a different start time must not match")
	}
	if err := Signal(pid, start+1, unix.SIGKILL); err == nil {
		t.Fatal("signal with the wrong start time must fail")
	}
	if err := Signal(pid, start, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if Alive(pid, start) {
		t.Fatal("reaped process still alive")
	}
	if Alive(os.Getpid(), 0) != true {
		t.Fatal("self not alive")
	}
}
