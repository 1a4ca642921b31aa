package task

import (
	"testing"

	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/typeurl/v2"
)

func TestProcessInfos(t *testing.T) {
	c := &Container{execs: map[string]*Process{
		"e1":      {ExecID: "e1", pid: 42},
		"pending": {ExecID: "pending"}, // not started: no pid to match
	}}
	got := ProcessInfos(c, []int{7, 42})
	if len(got) != 2 || got[0].Pid != 7 || got[0].Info != nil || got[1].Pid != 42 || got[1].Info == nil {
		t.Fatalf("ProcessInfos = %v", got)
	}
	v, err := typeurl.UnmarshalAny(got[1].Info)
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := v.(*options.ProcessDetails); !ok || d.ExecID != "e1" {
		t.Errorf("exec details %v", v)
	}
}
