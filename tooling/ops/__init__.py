"""Operations: supervisord deployment, scaling, status, autoscaling."""
