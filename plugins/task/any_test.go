package task

import "google.golang.org/protobuf/types/known/anypb"

type anyProto = anypb.Any
